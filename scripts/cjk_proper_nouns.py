"""Writes services/cache/data/cjk_proper_nouns.txt, the gazetteer of Chinese proper nouns that the semantic cache's
entity guard (chatmesh.cache.guards) looks for, from jieba's dictionary (MIT licence).

jieba's dict.txt has one `word frequency tag` a line. What is kept, always words of two or more CJK characters:

- places (ns) from frequency 20, organisations (nt) from 20, transliterated names (nrt) from 50;
- people (nr) only with three characters, a common surname first, from frequency 100: jieba's nr tag also
  holds many common words (明白, 文明, 卫星), which two-character names cannot be told apart from;
- other proper nouns (nz) only when they name a people, a religion, a language, a war, a movement, a website, a
  cup or a prize (by their last characters), or are picked by hand (NZ_KEPT): the rest of the tag is mostly
  common words (普通, 聊天, 论文);
- minus the common words found in those tags by reading them, most frequent first (BLOCKED): each would make
  a paraphrase that uses it and one that does not look like two questions about different things;
- plus chatmesh's own list (ADDED): brands and products that the dictionary lacks or tags as common words
  (华为, 小米, 微信), and product editions (专业版, 企业版).

A place written with its administrative suffix (武汉市, 湖北省, 华为公司) is compared as its short form when
that is in the list too: the line is `word<TAB>short form`.

Run it with a Python that has jieba installed (jieba is not a chatmesh dependency), or name the file:

    python scripts/cjk_proper_nouns.py [--jieba-dict PATH] > services/cache/data/cjk_proper_nouns.txt
"""

from __future__ import annotations

import argparse
import importlib.util
import re
import sys
from pathlib import Path

JIEBA_VERSION = "0.42.1"
JIEBA_LICENCE = """\
The MIT License (MIT)

Copyright (c) 2013 Sun Junyi

Permission is hereby granted, free of charge, to any person obtaining a copy of this software and associated
documentation files (the "Software"), to deal in the Software without restriction, including without limitation
the rights to use, copy, modify, merge, publish, distribute, sublicense, and/or sell copies of the Software, and
to permit persons to whom the Software is furnished to do so, subject to the following conditions:

The above copyright notice and this permission notice shall be included in all copies or substantial portions of
the Software.

THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR IMPLIED, INCLUDING BUT NOT LIMITED TO
THE WARRANTIES OF MERCHANTABILITY, FITNESS FOR A PARTICULAR PURPOSE AND NONINFRINGEMENT. IN NO EVENT SHALL THE
AUTHORS OR COPYRIGHT HOLDERS BE LIABLE FOR ANY CLAIM, DAMAGES OR OTHER LIABILITY, WHETHER IN AN ACTION OF
CONTRACT, TORT OR OTHERWISE, ARISING FROM, OUT OF OR IN CONNECTION WITH THE SOFTWARE OR THE USE OR OTHER DEALINGS
IN THE SOFTWARE."""

FLOORS = {"ns": 20, "nt": 20, "nrt": 50, "nr": 100, "nz": 100}
SURNAMES = frozenset(
    "王李张刘陈杨黄赵吴周徐孙马朱胡郭何高林罗郑梁谢宋唐许韩冯邓曹彭曾肖田董袁潘于蒋蔡余杜叶程苏魏吕丁任沈姚卢姜"
    "崔钟谭陆汪范金石廖贾夏韦付方白邹孟熊秦邱江尹薛闫段雷侯龙史陶黎贺顾毛郝龚邵万钱严覃武戴莫孔向汤"
)
NZ_ENDINGS = ("族", "教", "语", "文", "战争", "运动", "革命", "起义", "事变", "战役", "会议", "网", "杯", "奖")
NZ_KEPT = """
搜狐 新浪 搜狗 联通 三星 诺基亚 雅虎 长虹 国美 海信 伊利 飞利浦 丰田 东芝 摩根 纳斯达克 朗讯 中信 力帆 申花 泰达
国安 灿坤 红楼梦 三国演义 水浒传 论语 汉书 世界杯 奥林匹克 奥林匹克运动会 欧元 人民日报 中国日报 申报 清华 复旦
万历 贞观 大明 大唐 元大都 中华民族 东交民巷 西交民巷 人民英雄纪念碑 京广铁路 京九铁路 京沪铁路 青藏铁路 京杭运河
大运河 南水北调 三峡大坝 长江三峡水利枢纽工程 神舟 金星 恒河 君士坦丁堡 开罗 法兰克福 拉美 南通 金华 和田 旅顺
基隆 齐达内 金正日 富兰克林 培根 红十字会 甲骨文 第一次世界大战 第二次世界大战 二战 中世纪 十一届三中全会 穆斯林
维吾尔 犹太 犹太人 印第安人 英国人 希腊人 西班牙人 俄国人 印度人 朝鲜人 澳大利亚人 欧盟 珠三角 南亚次大陆 国家杜马
"""
BLOCKED = """
城市 东西 平原 外国 爱国 南北 自治州 英雄 朝廷 太阳 哥哥 海洋 自治县 湖泊 大桥 高原 上市 建国 美丽 山区 江湖 大街
王国 开国 共和国 城镇 大都 京城 阿哥 庆典 南路 深度 山脉 回国 治安 大国 新鲜 古城 海峡 河口 冰川 长度 山水 长大
琉璃瓦 普及 商城 内河 古典 阴阳 江山 高山 大海 山坡 河谷 上马 太平 福利 日志 云集 青春 山河 神圣 桥头堡 中路 新建
西门 法西斯 中断 河水 山洞 都城 关联 海湾 上半场 广义 湖水 大圣 上山 江水 南门 新港 新城 海关 舞美 大洋 山峰 内城
石桥 中密度 北门 中洲 下山 上台 山寨 西洋 契约 二哥 白马 入口 入市 路桥 金牙 都市 广布 古都 诸国 重镇 三角洲 天河
江中 山口 大山 故城 黄连 千古 城堡 中道 深山 江河 新河 伦理 泉水 渡江 城垣 大河 南口 治国 中和 天黑 法典 诸州 四中
三中 山镇 长河 池塘 天桥 加盟 登山 龙大 密封 上门 黄沙 立马 海滨 莫大 湖区 城南 沿河 海滩 西路 牡丹 西瓜 东路 贵宾
卫国 入海 沧海 滨海 嘉宾 东坡 屯田 海港 北路 山林 北风 赞美 那大 新村 和县 波罗 泰来 沙河 大城 桃园 北流 天池 吉利
四海 河湖 登极 入川 台地 大门口 上路 北山 庙里 礼拜 兴旺 阿弥陀佛 山羊 深海 远洋 青竹 井口 台基 中堂 亚平 山门 湘云
正南 朝野 深谷 台风 山岭 白嫩 余脉 象牙 东州 中西 归国 河湾 渡河 河里 四门 江流 长山 上铺 海岛 入门 南山 土城 深渊
中阳 河畔 如林 夕阳 江城 英美 河沟 永固 远古 中建 港湾 虎山 新春 花山 新桥 沙湾 绕城 苏打 台站 东至 亚科 拉古 来京
波及 东宫 北城 绵羊 青木 冰山 通城 旧城 江底 五县 古镇 太极 后湖 南港 伦比 山庄 横沟 安顿 北湖 江海 白洋 马口 大寨
大湾 南郊 城东 罗家 古山 固城 三鲜 广度 江南西 堰口 江道 大江 关山 大湖 莲蓬 六中 满口 美德 欢庆 北郊 郡县 龙井 乌黑
山野 天宫 密林 立国 开朗 上古 上街 缅怀 兴隆 珍藏 端庄 松林 半封建 锦旗 大伯 山沟 黑洞 沙洲 上楼 广为 香水 后山 四壁
越野 河滩 法度 虎口 大兴土木 法门 浅海 入阁 大中城市 大坝 两河 山丘 新旧 北坡 佛门 大洲 朝霞 沧桑 湖畔 苏木 大岛 海沟
南瓜 满城 西站 滑坡 上城 串联 云头 南城 小国 青山 黑马 云中 美化 长脚 葡萄园 回城 深藏 山村 旁门 香兰 古堡 登门 卧龙
大关 海岭 海鲜 太阳穴 九门 山崖 西街 开山 青龙 盐湖 东街 扎根 阳极 得意洋洋 满头大汗 万国 日隆 沙沙 河川 横梁 山城
满嘴 大港 恩典 西宫 三山 三边 下海 华里 加密 南堡 新区 龙脉 三联 大江南北 永平 南岛 大城市 大黑 天街 巴士 平西 东山
上峰 中风 上京 中古 列国 安乐 四国 爱美 中海 湖盆 盘古 上下水 湖底 牙关 鞍马 马脚 广博 黄水 天威 南国 金城 中加 圣明
罗列 信口开河 墨水 河港 城建 两江 半山 东南西北 满意度 石河 朝拜 马岛 长街 火山岛 英里 府城 灵山 中央革命根据地 天马
歇斯底里 高高兴兴 中考 保鲜 湖滨 钱塘 东渡 云山 南宫 长尾 抚摩 中藏 远非 陡坡 满街 渡海 美感 阳城 太阴 朝外 满门 西化
远山 安家 古国 九宫 江口 火海 石山 吉他 常山 平原区 西坡 连城 馆驿 临江 开城 白河 绥靖 复国 文明古国 浑河 欧里 深涧
铺平 下城 寿山 朝圣 秦河 株连 海城 一棵树 人山人海 无极 朝里 横山 匹夫 山岳 五原 独木桥 密约 馆藏 东西南北 丹根 虎狼
土坡 塔顶 山脚 故国 三河 委顿 临海 平城 摩崖 新约 龟甲 上中 三桥 西区 天国 海马 清溪 西营 中居 四野 城关 城隍 榆树
胶原 虹桥 英武 临街 中上 巴萨 旁门左道 永宁 银联 崇山峻岭 拜寿 神山 井水 山海 西河 云海 大哥大 深水港 龙尾 万古 中度
大院里 治本 科教兴国 上东 东东 东道国 台子上 天南地北 山北 治沙 海疆 石头城 镶边 高头大马 下马威 中士 印花布 垦区
日兴 江天 美眉 茅塞顿开 蒙头 陆海 中高 南坡 扎堆 旧城区 阳沟 香茅 魁首 中山狼 古寺 合龙 吐口 君临 夕阳西下 正东 灌木林
牙根 玉璧 里弄 长门 雅兴 龙潭虎穴 杏山 土建 驻屯 临门 五绝 佳丽 塔楼 山根 木牛流马 直角三角形 高山流水 北口 午休 多汗
大槐树 新店 洪荒 深坑 紫罗兰 葡萄干 酒兴 云台 商海 河底 深井 甘美 美食城 镇区 锦鸡 入时 北人 古本 城根 意兴 拉下马
拜拜 攀岩 斗嘴 比兴 留洋 英灵 外县 天南海北 循环赛 抚平 新城区 高架桥 上水 中波 城门洞 安度 山地区 开沟 捷足 播撒 蓝海
黑瓦 会昌 壶嘴 天波 维度 老港 西市 长亭 三区 上士 北站 南区 南村 圣城 夷平 张本 沧海桑田 石坝 舟桥 藩篱 西渡 避风港
长坂 中京 中环 云杉林 关兴 固沙 堰塞湖 墨黑 大公国 大川 天南 天圣 望海 法律化 珠宝店 内省 北京路 北北东 北角 南和 印本
古城堡 开环 旧都 杏林 棕黑 江堤 辽远 里巷 雅士 上野 北头 埃斯 棋圣 泉城 石城 金都 三洞 入港 军民共建 北岳 本山 正西
避暑山庄 青山绿水 非西方 中北 中港 剑眉 北图 台阁 大桥头 宿根 小桥流水 开河 横木 翼根 西园 长天 长路 高冈 高平原 中岛
四荒 大三阳 天文地理 富藏 尖山 川口 一马平川 东河 五古 兴利 印堂 坪上 大沟 巴西木 弥撒曲 炭黑 珠联璧合 美达 腾达 英石
赤旗 长班 阳山 阳湖 阴河 上林 下拉 东奔西跑 东岛 东峰 北极光 南大门 团徽 塔门 大东 太阳宫 安乐窝 安和 屏山 斯山 江河水
江湖术士 炮台镇 随顺 鞍马劳顿 高山峻岭 麦饭石 遮阳 三城 三弄 三阳 中田 中长跑 会徽 内尔 南台 南里 大埔 宜山 山峡 川原
河图 河桥 河海 温江 溪河 满园 美林 蓬蓬 西村 马市 东沟 乌伦古 亚非 凉开水 圣湖 堪舆 墨城 大西南 宁寺 巨港 巴苏 德布
日落西山 望江 石海 湖湾 满山 琼脂 长湖 长滩 防沙 三岔路口 上堂 上田 富藏 大明湖 宝岛 安国 北区 加仑 冰河 北岛 商都
天都 欢度 河山 高原区 中心区 广开 开春 扬威 捷利 无底洞 多极 叙旧 大寺 大西 上达 下联 上联 上坡 半壁江山 吐丝 抚琴
长眠 阴沟 邦联 中平 吐纳 天极 太平盛世 宜居 朝南 阳坡 城邑 塞车 怀古 番邦 上海滩 佛国 吉庆 咸水 四乡 大雅 洋洋 海塘
滨湖 长嘴 长随 下河 山岗 拱坝 山陵 漠漠 喜孜孜 内海 北大营 德山 山县 山本 沾边 火地岛 石臼 上屋 花都 荷塘 衙前 攸关
延时 惠及 多嘴 喝西北风 青梅竹马 黄土地 酒都 陵县 三岛 海山 龙岭 上谷 拱桥 山溪 擂台赛 商港 土山 大藏 三镇 日增
平平安安 五洲 山乡 山泉 峡湾 并联 离岛 长龙 马山 河渠 深山老林 百万富翁 黄门 井台 冰封 山鸡 碧海 多角度 山塘 美美 馆里
上苍 中地 仙山 北关 千岛 正北 甘拜下风 上宾 中科 九尾 冰河 三本 上西天 千山 太阳城 所罗门 二连 北镇 波特 上联 中远
广平 归西 德兰 德治 新市 横街 沙海 花城 英雄本色 虎威 都市区 三宫 三江口 三角区 下江 四极 天城 山国 山寺 南浦 兴利
卧佛 冈村 中区 八连 八宝山 黄牙 江湾 江畔 沙区 歇马 旧大陆 旅欧 山山水水 巴巴 福寿 西峰 西马 长宁 青马 香江 马河 黄桥
三宫六院 中岛 中牟 京南 伊兰 保国 加利 加斯 古建 古桥 台布 哥达 安多 巴巴 庐陵 平安里 府县 湖东 东乡 东区 大都市 山冈
庙前 庙坪 馆内 中联 伦常 南京路 喜乐 土地庙 川北 德尔 北道 古庙 七绝 九溪 拱桥 中卫 中巴 六甲 山溪 城隍庙 土山 日增
大藏省 大牙 山梁 叶县 长波 阿兰 中国香港 中水 中立国 入海口 千里马 华西 无人区 松脂 红瓦店 龙潭 下坡 努嘴 北河 山阳
落山 龙城 南院 爱多 长平 长白 意中 大马 安盟 平山 爪牙 石匣 祥云 仙丹 深沟 山岩 福地 长绳 富国 东巴 中街 二本 北国
卡门 太古 库藏 蛟龙 咸水湖 二龙 三通 二人 令人 登基 崇拜 大王 多谢 崇高 二中 四纵 保姆 豪杰 天王 崇尚 威武 克拉 家里人
在城镇 休克 多达 托人 默契 五中 新奇 新颜 玛瑙 梓树 大德 恩人 勒马 舍人 宜人 纳米 始祖 圣贤 称王 彼岸 勒索 拜佛 中庸
旭日 卢比 夸克 换人 施舍 勾勒 二成 希罕 马尾 丽人 入世 在世 灵芝 瓦斯 摩托 拜托 海洛因 比萨 朗朗 御膳 二郎 凉亭 荷尔蒙
路基 盖世 二里 夸赞 舍利 密宗 托拉斯 令郎 比特 长鸣 割舍 撒野 永世 吉日 界内 府第 育人 摩登 昭雪 西人 令牌 慈和 孝廉
令爱 山里人 济世 日晒 夸口 芥蒂 奎宁 阿米巴 斯人 太虚 约莫 科普 卡拉 拉拉 比比 阿拉 达罗 多利 多克 海王 菲尔 国家机关
联合会 文理学院 高级中学 理工学院 国际化 交易所 通讯社 社会科学 建设路 音乐会 音乐学院 天文学 商学院 商业银行 音乐厅
美术馆 文工团 伦理学 中国区 四合院 联合体 卫生院 中医药 统计学 施工队 信息中心 黑社会 超级大国 海洋生物 大中学校 中文系
加工厂 古典文学 儿童文学 最大化 人文科学 民族学 法学院 中草药 文学院 军事学院 新政府 公共场所 新闻社 招生办 理工大学
加油站 青年团 农学院 中医学 新闻学 联谊会 交汇处 非政府 汇合处 海洋学 美国市场 法理学 越野车 交战国 新生事物 通信网
中央处理器 福利院 团组织 美国公司 社会科学院 中国化 公共汽车 儿童医院 青年会 神学院 邮电局 复合物 百货商店 加盟店 航空展
综合司 加工区 硬邦邦 京剧团 供电局 中医院 农业社 邮政局 交通局 商务网 新闻公报 税务局 深加工 科研院所 新市区 自由贸易区
马戏团 国库券 汇报会 文学社 河外星系 人口学 新闻局 联络处 党委会 卫生学 财务部 上进心 光学玻璃 东方学 网络通信 国家有关
宪法学 对外部 法医学 外科学 广播电台 建交国 经济委员会 镇政府 科研所 综合大学 青年队 卫生所 国际部 武装部 光通信 药学院
财政学 中等学校 商业局 文艺部 人财物 国际局 广播电视 开发部 最高潮 联邦区 团政委 政法大学 农业局 中体西用 中青 中装 中发
中放 中经 中师 中电 爱国心 美术系 日本公司 日报社 广播站 中国通 信托投资公司 安全部队 国际队 交易会 人力资源部 中人
党组织 人民军队 国家队 联合政府 军政府 中央政府 美国政府 社会党 民主党 陆军大学 外事委员会 法律委员会 人民共和国 中大
安全局 音乐学 民法学 陆战队 药监局 卫生局 卫生厅 财政局 财政厅 民政局 民政厅 统计局 新闻处 新闻司 外科学 农业大学 国统区
黄金周 杜鹃花 胡萝卜 许可证 石英砂 马尾松 金钱豹 金元宝 金刚石 高新区 胡杨林 白玉兰 武昌鱼 严重者 严重性 段时间 白花花
雷阵雨 武林中 高中生 叶绿体 叶绿素 黄绿色 高岭土 石狮子 高尔夫 陆海空 白玉石 金毛狮 龙画凤 金刀绣 钱孙爱 赵钱孙 杨二人
吴县人 黄州菜 李中堂 李公子 朱先生 程先生 胡先生 胡大哥 丁大哥 杨大哥 林师弟 陈政委 王大夫 卢大夫 姚师傅 孙婆婆 史婆婆
王夫人 孙夫人 郭夫人 汤夫人 丁夫人 韩太太 冯公公 魏公公 高太尉 彭长老 徐长老 郑公子 陆庄主 石庄主 黄帮主 郭大侠 邵大侠
陈瞎子 刘司令 李铁嘴 王铁口 黄蓉笑 黄蓉见 郭靖见 杨过笑 武进士 袁大头 袁相公 万寿羹 黄瓦朱 黄瓦飞 石象生 陈总舵 唐贞观
家族 大族 上班族 论文 正文 天文 评语 自语 管教 调教 家教 求教 文学奖 大奖 金奖 嘉奖 中奖 开奖 二等奖 三等奖 新闻网
反革命 和文 外国语 五毒教 联网 文教 高教 一路平安
"""
ADDED = """
华为 小米 苹果 微软 谷歌 腾讯 阿里巴巴 阿里云 百度 京东 淘宝 天猫 支付宝 微信 企业微信 抖音 快手 拼多多 美团 饿了么 滴滴
字节跳动 今日头条 网易 新浪 微博 哔哩哔哩 知乎 豆瓣 小红书 亚马逊 特斯拉 比亚迪 蔚来 小鹏 联想 三星 索尼 任天堂 英伟达
高通 英特尔 甲骨文 脸书 推特 优步 奈飞 网飞 领英 必应 火狐 钉钉 飞书 携程 爱奇艺 优酷 星巴克 麦当劳 肯德基 可口可乐
百事可乐 耐克 阿迪达斯 宜家 沃尔玛 顺丰 中通 圆通 韵达 申通 中国移动 中国联通 中国电信 工商银行 建设银行 农业银行
中国银行 招商银行 交通银行 安卓 鸿蒙 一加 魅族 大疆 格力 海尔 海信 南冰洋 南大洋
专业版 高级版 基础版 旗舰版 标准版 企业版 免费版 个人版 家庭版 团队版 入门版 尊享版 豪华版 青春版 至尊版 商业版 教育版
体验版 试用版 正式版 测试版 社区版 开发者版
"""
# An entry with one of these suffixes is compared as its short form when the short form is an entry too.
SHORT_FORM_SUFFIXES = ("特别行政区", "自治区", "地区", "公司", "集团", "市", "省", "县", "区")
CJK_WORD = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff]{2,}")


def _jieba_dict() -> Path:
    spec = importlib.util.find_spec("jieba")
    if spec is None or spec.origin is None:
        sys.exit("jieba is not installed in this Python: pass --jieba-dict PATH (jieba's dict.txt)")
    return Path(spec.origin).with_name("dict.txt")


def _kept(word: str, frequency: int, tag: str) -> bool:
    if tag not in FLOORS or frequency < FLOORS[tag] or not CJK_WORD.fullmatch(word):
        return False
    if tag == "nr":
        return len(word) == 3 and word[0] in SURNAMES
    if tag == "nz":
        return word.endswith(NZ_ENDINGS)
    return True


def proper_nouns(dictionary: Path) -> dict[str, str]:
    """Every kept word, mapped to the form it is compared as."""
    blocked = set(BLOCKED.split())
    words = set(ADDED.split()) | set(NZ_KEPT.split())
    for line in dictionary.read_text(encoding="utf-8").splitlines():
        word, frequency, tag = line.split(" ")
        if _kept(word, int(frequency), tag):
            words.add(word)
    words -= blocked
    forms = {}
    for word in sorted(words):
        short = next((word.removesuffix(s) for s in SHORT_FORM_SUFFIXES if word.endswith(s)), word)
        forms[word] = short if len(short) >= 2 and short in words else word
    return forms


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jieba-dict", type=Path, help="jieba's dict.txt (default: the installed jieba's)")
    dictionary = parser.parse_args().jieba_dict or _jieba_dict()
    forms = proper_nouns(dictionary)
    header = [
        "CJK proper nouns for chatmesh's semantic-cache entity guard (chatmesh.cache.guards).",
        f"Derived from the dictionary of jieba {JIEBA_VERSION} (https://github.com/fxsjy/jieba, dict.txt) by",
        "scripts/cjk_proper_nouns.py, which says what is kept; regenerate with that script, do not edit.",
        "Format: one word a line; `word<TAB>short form` when it is compared as a shorter entry.",
        "jieba's licence:",
        "",
        *JIEBA_LICENCE.splitlines(),
    ]
    out = sys.stdout
    out.writelines(f"# {line}".rstrip() + "\n" for line in header)
    for word, form in forms.items():
        out.write(f"{word}\t{form}\n" if form != word else f"{word}\n")


if __name__ == "__main__":
    main()
